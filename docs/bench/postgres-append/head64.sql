SELECT append_head(64);
