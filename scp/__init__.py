"""DICOM networking of pacsnode: the storage SCP, peer policy, spool and index
writes, the SCU helper. Importing it changes nothing in pynetdicom: the
patches of :mod:`pacsnode.scp.patches` are installed by ``install()``."""
