"""The operations console: server-rendered pages for the people who run the node.

:mod:`.pages` (sign-in, dashboard, skipped series, destinations, configuration,
users) and :mod:`.jobs` (the job list and a job's page, with the operator's
retry, re-run and download); :mod:`.render` makes the pages, :mod:`.charts`
their charts. Who may see and do what is :mod:`pacs_node.web.auth`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pacs_node.web.auth import Doorkeeper
from pacs_node.web.console.jobs import job_routes
from pacs_node.web.console.pages import page_routes

if TYPE_CHECKING:
    from pacs_node.node import Node


def console_routes(node: "Node", door: Doorkeeper) -> list:
    return [*page_routes(node, door), *job_routes(node, door)]
