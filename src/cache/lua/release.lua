-- Ends a coalesced call: leaves its outcome for the followers (if any), frees the lock
-- if this token still holds it, and tells the other instances.
-- KEYS: the lock, the outcome. ARGV: the token, the outcome ('' for none), how long
-- the outcome is kept (ms), the channel, the message.
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
