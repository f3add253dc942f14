-- A write moves its scopes' generations: each gets a value no write used before, kept
-- as long as any entry that read the old one can live.
-- KEYS: the scopes' generations. ARGV: how long to keep them (ms), then the new values.
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ARGV[1])
end
return 1
