SELECT append_set(256);
