"""Customer-site code: face analysis, Identity Net training, federation client, payload sealing. Photos never leave."""
