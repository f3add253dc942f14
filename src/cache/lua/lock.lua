-- The coalescing lock: taken (1) when free, renewed (1) when this token holds it,
-- otherwise 0. KEYS: the lock. ARGV: the token, the lease (ms).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
