"""DICOM networking of pacsnode: the storage SCP, peer policy, spool and index writes."""
