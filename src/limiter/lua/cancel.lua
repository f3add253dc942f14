-- Drops a reservation whose slot has not started yet (a waiter that gave up).
-- KEYS: log. ARGV: the waiter's id.
local slot = redis.call('ZSCORE', KEYS[1], ARGV[1])
if slot and tonumber(slot) > now then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
