-- An entry and the generations of the scopes it depends on.
-- KEYS: the entry, then each scope's generation. ARGV: none.
return redis.call('MGET', unpack(KEYS))
