"""The identified archive: content-addressed blobs, sealed at rest (AES-256-GCM), that every
stage reads identified files from."""
