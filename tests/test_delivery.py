"""A PACS that stops answering, or aborts, in the middle of a delivery: the attempt fails
with a DeliveryError that says why (the scheduler then retries it), never an untyped error,
and what is left is not waited for."""

from __future__ import annotations

import threading
import time

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from config import Destination, DestinationKind
from orthanc import free_port
from pacs_node.delivery import DeliveryError, send_dimse


@pytest.mark.parametrize("pacs, why", [
    ("stops answering", "no response within 2 s"),
    ("aborts", "association aborted by the peer"),
])
def test_a_pacs_that_fails_midway_fails_the_attempt_with_a_clear_error(study_factory, pacs,
                                                                        why):
    files = list(study_factory("covid", 1, 24).files[:3])
    answered, release = [], threading.Event()

    def on_store(event):
        if answered:                      # the second C-STORE is never answered
            if pacs == "aborts":
                event.assoc.abort()
            release.wait(10)
            return 0x0000
        answered.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    scp = AE(ae_title="BADPACS")
    scp.add_supported_context(pydicom.dcmread(files[0]).SOPClassUID,
                              [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    destination = Destination(name="bad", kind=DestinationKind.dimse, ae_title="BADPACS",
                              host="127.0.0.1", port=port)
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryError) as failed:
            send_dimse(destination, files, "LUNGSYS", timeout=2)
        took = time.monotonic() - started
    finally:
        release.set()
        server.shutdown()
    assert str(failed.value) == f"2 of 3 objects not stored ({why})"
    assert not failed.value.permanent          # the scheduler tries again later
    assert len(answered) == 1 and took < 9     # the third file was not waited for
