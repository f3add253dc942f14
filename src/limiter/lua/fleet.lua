-- The fleet: every instance whose lease is live, with what it told and how long ago it
-- renewed (µs). KEYS: the fleet's sorted set. ARGV: lease (µs), the hashes' key prefix.
-- Returns a flat list: id, age, then its hash as field/value pairs, per instance, each
-- instance's part preceded by its length.
local out = {}
local live = redis.call('ZRANGEBYSCORE', KEYS[1], s(now - tonumber(ARGV[1])), '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  local info = redis.call('HGETALL', ARGV[2] .. live[i])
  out[#out + 1] = #info + 2
  out[#out + 1] = live[i]
  out[#out + 1] = s(now - tonumber(live[i + 1]))
  for _, v in ipairs(info) do out[#out + 1] = v end
end
return out
