"""DICOM networking of pacsnode: the storage SCP, peer policy, spool and index writes."""

from pacsnode.scp.reactor import install as _install_reactor_checkpoint

_install_reactor_checkpoint()
