-- Merges a fallback log back into Redis when it answers again.
-- KEYS: log. ARGV: the longest window (µs), then per start: its offset from now (µs,
-- negative for the past) and its id.
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], s(now + tonumber(ARGV[i])), ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], s(math.ceil(tonumber(ARGV[1]) / 1000) + 120000))
return 1
