"""The core every part of pacsnode shares: settings, the error hierarchy with
its DICOM, HTTP and retry dispositions, the data folder's layout and the state
enums. The core imports nothing else of pacsnode. See docs/architecture.md."""
