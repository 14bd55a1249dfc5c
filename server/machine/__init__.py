"""What this machine gives the engine: its CPU cores (and how busy other processes keep them) and its memory."""
