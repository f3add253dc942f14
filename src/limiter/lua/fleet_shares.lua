-- What each client got of the slots granted from the line over the last minute (six
-- buckets of 10 s), in turns (slots / weight), for Jain's index.
-- KEYS: 1 any key of the account (its hash slot). ARGV: 1 shares' prefix.
-- Returns client, turns (in TURN units), ...
local sum = {}
local b = math.floor(now / 10000000)
for k = b - 5, b do
  local all = redis.call('HGETALL', ARGV[1] .. s(k))
  for i = 1, #all, 2 do sum[all[i]] = (sum[all[i]] or 0) + tonumber(all[i + 1]) end
end
local out = {}
for c, n in pairs(sum) do
  out[#out + 1] = c
  out[#out + 1] = s(n)
end
return out
