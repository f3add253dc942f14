-- Starts each window holds now. KEYS: log. ARGV: windows from 1.
local out = {}
for k = 1, tonumber(ARGV[1]) do
  local length = tonumber(ARGV[1 + 2 * k])
  out[k] = redis.call('ZCOUNT', KEYS[1], '(' .. s(now - length), s(now))
end
return out
