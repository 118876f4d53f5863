SELECT append_head(1);
