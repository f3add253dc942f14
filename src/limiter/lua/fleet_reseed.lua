-- After the log was lost (FLUSHALL, a new Redis): this instance writes back the starts
-- it made within the longest window; the hold on grants ends once every instance that
-- was live has, or when it runs out.
-- KEYS: 1 log, 2 hold, 3 reseeded. ARGV: 1 instance, 2 longest window (µs), then per
-- start its offset from now (µs) and its id.
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], s(now + tonumber(ARGV[i])), ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], s(math.ceil(tonumber(ARGV[2]) / 1000) + 120000))
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], 60000)
local want = tonumber(redis.call('GET', KEYS[2]) or '0')
if want > 0 and redis.call('SCARD', KEYS[3]) >= want then redis.call('DEL', KEYS[2]) end
return 1
