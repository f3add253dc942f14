-- Pauses the account (an upstream 429): no slot before now + the pause, and every
-- slot not yet started moves back by what the pause adds; announced on the channel.
-- KEYS: log, pause. ARGV: the pause (µs), channel.
local target = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if target > cur then
  redis.call('SET', KEYS[2], s(target), 'PX', s(math.ceil(tonumber(ARGV[1]) / 1000) + 1000))
  cur = target
end
local waiting = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. s(now), '+inf', 'WITHSCORES')
if #waiting > 0 and cur > tonumber(waiting[2]) then
  local delta = cur - tonumber(waiting[2])
  for i = 1, #waiting, 2 do
    redis.call('ZADD', KEYS[1], s(tonumber(waiting[i + 1]) + delta), waiting[i])
  end
  redis.call('PEXPIRE', KEYS[1], s(math.ceil((cur - now) / 1000) + 120000))
end
redis.call('PUBLISH', ARGV[2], 'moved')
return 1
