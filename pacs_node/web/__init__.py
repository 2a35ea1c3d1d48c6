"""The node's HTTP service: one uvicorn server (behind the peer gate and a deadline for
each request's head, :mod:`pacs_node.web.protocol`) serving one Starlette app: STOW-RS
(:mod:`pacs_node.stow`), health and Prometheus metrics (:mod:`pacs_node.web.health`)."""
