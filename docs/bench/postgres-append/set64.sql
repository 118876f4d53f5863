SELECT append_set(64);
