-- `limit.per_client` over the fleet: a GCRA on the client's theoretical arrival time.
-- KEYS: the client's key. ARGV: the emission interval (period / requests) and the
-- period, both µs. Returns 0 when admitted, else the wait (µs) until it would be.
local interval, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next = tat + interval
if next - period > now then return next - period - now end
redis.call('SET', KEYS[1], s(next), 'PX', s(math.ceil((next - now) / 1000) + 1))
return 0
