INSERT INTO plain (stream, data) VALUES ('s' || (random() * 10000)::int, convert_to(repeat('x', 256), 'UTF8'));
