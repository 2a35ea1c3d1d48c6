"""The node's HTTP service: one uvicorn server (behind the peer gate and a deadline for
each request's head, :mod:`pacs_node.web.protocol`) serving one Starlette app: STOW-RS
(:mod:`pacs_node.stow`), WADO-RS for workers (:mod:`pacs_node.wado`), health and
Prometheus metrics (:mod:`pacs_node.web.health`), the console
(:mod:`pacs_node.web.console`).

Importing the package registers ``{name:id}`` for routes' paths (:class:`RowId`)."""

from starlette.convertors import Convertor, register_url_convertor


class RowId(Convertor):
    """A row number in a URL: digits that fit the job store's integers (a longer one is
    404, not an overflow in the database)."""

    regex = "[0-9]{1,15}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("id", RowId())
