"""One module per external imaging tool the stages share (antspyx registration: ``register``)."""
