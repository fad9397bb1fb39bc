# RAM-record parser bindings (stream codec).
