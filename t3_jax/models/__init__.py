"""The networks, one file each: the Wan DiT, the Wan VAEs, the umT5 text encoder."""
