-- An instance renews its lease: its renewal time in the fleet's sorted set, and what it
-- tells about itself in a hash that expires with the lease. Leases not renewed within
-- `redis.lease` are reclaimed (and their hashes dropped).
-- KEYS: the fleet's sorted set. ARGV: instance id, lease (µs), the hashes' key prefix,
-- then field/value pairs. Returns {live instances, reclaimed}.
local lease = tonumber(ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. s(now - lease))
for _, id in ipairs(gone) do redis.call('DEL', ARGV[3] .. id) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. s(now - lease)) end
redis.call('ZADD', KEYS[1], s(now), ARGV[1])
redis.call('PEXPIRE', KEYS[1], s(math.ceil(lease / 1000) * 2))
local info = ARGV[3] .. ARGV[1]
local fields = {}
for k = 4, #ARGV do fields[#fields + 1] = ARGV[k] end
redis.call('HSET', info, unpack(fields))
redis.call('PEXPIRE', info, s(math.ceil(lease / 1000)))
return {redis.call('ZCARD', KEYS[1]), #gone}
