-- A follower's look at a coalesced call on another instance: whether its lock is
-- held, and its outcome once there is one. KEYS: the lock, the outcome. ARGV: none.
return {redis.call('EXISTS', KEYS[1]), redis.call('GET', KEYS[2])}
