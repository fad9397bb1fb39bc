# Page sink, zero detection and checksum bindings (image side).
