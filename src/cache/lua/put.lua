-- Keeps an answer unless a write moved one of its scopes since it was asked for.
-- KEYS: the entry, then each scope's generation.
-- ARGV: the encoded entry, its lifetime (ms), then each generation as read ('0': none).
for i = 2, #KEYS do
  local now = redis.call('GET', KEYS[i]) or '0'
  if now ~= ARGV[i + 1] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
