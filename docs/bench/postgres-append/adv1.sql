SELECT append_adv(1);
