SELECT append_adv(64);
