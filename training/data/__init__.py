"""mini-CVIT data: procedural scenes, task generators, the LLaVA/CVIT JSON format, batching."""
