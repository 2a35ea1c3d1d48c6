"""Model-side of lungsys: CT series loading, preprocessing, the M3 Lung-Sys
networks, localisation and result objects. Never imports :mod:`pacs_node`."""
