"""Deliver stage: send the report objects to each configured destination (EDGE).

- :mod:`~dicomnode.deliver.folder`: Part 10 files in a folder tree (the embedded default);
- :mod:`~dicomnode.deliver.stow`: STOW-RS to a DICOMweb server (PS3.18);
- :mod:`~dicomnode.deliver.cstore`: C-STORE to a DICOM peer (PS3.4 Annex B).

Every destination answers a :class:`~dicomnode.types.DeliveryResult` with one outcome per
instance and whether a retry can help; none raises for a failed delivery.
"""

from dicomnode.deliver.base import Destination, make_destination

__all__ = ["Destination", "make_destination"]
