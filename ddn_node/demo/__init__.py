"""The one-machine demonstration: the node, a local Orthanc as the PACS, sample studies."""
