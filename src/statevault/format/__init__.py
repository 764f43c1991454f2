"""Pure format code (numpy at most): manifest, tree encoding, dtypes, checksums, safetensors."""
