"""Pipeline specs (name, version, image, command, outputs) and built-in pipelines."""
