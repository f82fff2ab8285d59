"""The TotalSegmentator example CT was anonymised with blank dataset UIDs (SOP Instance, Study,
Series; only the file meta keeps the SOP Instance UID). No PACS holds such files and the node
refuses them; tests that need the series itself give the UIDs back, pixel data untouched, with
the same helper the segmentation training uses for its out-of-domain check."""

from __future__ import annotations

from dicomnode.train.segmentation import restore_blank_uids as restore_uids

__all__ = ["restore_uids"]
