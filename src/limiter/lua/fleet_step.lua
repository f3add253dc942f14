-- One step of an account's fleet line, run by any instance that has something to do:
-- it registers this instance's newcomers (the fast path: nobody waiting and a slot free
-- now, it starts at once), grants every slot that is due to the head of fair order,
-- refuses the waiters whose turn can no longer come by their deadline, and hands this
-- instance what was decided for its waiters.
--
-- Fair order: a promoted waiter (the starvation floor), then class high, normal, low (one
-- sorted set each, score = virtual finish tag, member = the waiter's id, 20 digits, so
-- equal tags go by id); a tag is max(the class's virtual time, the client's last tag)
-- plus TURN / weight, as in fair.rs.
--
-- KEYS: 1 log, 2 pause, 3 limit, 4-6 the classes' lines, 7 promoted, 8 waiters (id ->
-- "instance deadline class step tag client"), 9 tags (vt<c>, p<c>, c<c>:<client>),
-- 10 leases, 11 epoch, 12 hold, 13 reseeded, 14 busy (set while anyone may wait).
-- ARGV: 1 instance, 2 lease (µs), 3 the epoch this instance knows ('' none), 4 a new
-- epoch, 5 live instances, 6 hold (ms), 7 followed window (1-based), 8 most waiters
-- walked, 9 two flags: walk (1: re-check every deadline) and registered (1: this
-- instance has waiters registered already), 10 channel, 11 granted lists' prefix,
-- 12 FLOOR, 13 shares' prefix, 14 windows, then per join: its id and
-- "<rejoin><class> <step> <max_wait µs> <client>" (rejoin 1: drop its old entry first;
-- class 1-3), read only when it waits.
-- Returns strings: status ('0', or '1': reseed first), epoch, lapsed ('1': this
-- instance's lease had run out), now (µs), next due (µs, -1: nobody waits), one letter per join
-- ('g': it started, 'w': it waits), how many decisions, the decisions for waiters
-- registered before ("g <id> <granted at, µs>", "r|p <id> <retry µs> <window>"), then per window the
-- starts it holds now (what a fallback must count as the others').
local inst, lease = ARGV[1], tonumber(ARGV[2])

local kept = redis.call('MGET', KEYS[3], KEYS[2], KEYS[12], KEYS[7], KEYS[11], KEYS[14])
local epoch = kept[5]
if not epoch then
  redis.call('SET', KEYS[11], ARGV[4])
  if ARGV[3] ~= '' then
    -- The log is gone (FLUSHALL, a new Redis): nothing is granted until the instances
    -- wrote back what they started, or the hold runs out.
    redis.call('SET', KEYS[12], ARGV[5], 'PX', ARGV[6])
    redis.call('DEL', KEYS[13])
    return {'1', ARGV[4]}
  end
  epoch = ARGV[4]
elseif ARGV[3] ~= '' and epoch ~= ARGV[3] then
  return {'1', epoch}
end

local walk, registered = ARGV[9]:sub(1, 1) == '1', ARGV[9]:sub(2, 2) == '1'
local lapsed = '0'
if registered then
  local seen = redis.call('ZSCORE', KEYS[10], inst)
  if not seen or tonumber(seen) < now - lease then lapsed = '1' end
end
local alive = {[inst] = true}
local function is_alive(i)
  local a = alive[i]
  if a == nil then
    local at = redis.call('ZSCORE', KEYS[10], i)
    a = at ~= false and tonumber(at) >= now - lease
    alive[i] = a
  end
  return a
end

local adopted = tonumber(kept[1] or 'nil')
local ws, longest = windows(14, tonumber(ARGV[7]), adopted)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', s(now - longest))
local paused = tonumber(kept[2] or '0')
local held = kept[3] ~= false
local promoted = kept[4]

-- The log: entry i (0-based) read once, then the starts of this call and, while
-- walking, the slots the waiters would take.
local logged = redis.call('ZCARD', KEYS[1])
local added = {}
local entry = log_entries(KEYS[1], logged, added)
-- The next free slot after the log (and the pause), and the window that held it back.
local function next_slot()
  return slot_for(logged + #added, entry, ws, paused)
end
local zadd, at_now = {}, s(now)
local function start(m)
  added[#added + 1] = now
  zadd[#zadd + 1] = at_now
  zadd[#zadd + 1] = m
end

local lines = {KEYS[4], KEYS[5], KEYS[6]}
-- Nobody waits (the fast path's case): known from the busy flag, without asking the
-- lines (a flag left set by a leaver is cleared by the first look that finds nobody).
local busy = kept[6] ~= false
local empty = not promoted and not busy
local function info(m)
  local v = redis.call('HGET', KEYS[8], m)
  if not v then return nil end
  local i, d, c, st, tg, cl = string.match(v, '^(%S+) (%S+) (%S+) (%S+) (%S+) (.*)$')
  return {inst = i, deadline = tonumber(d), class = tonumber(c), step = tonumber(st),
    tag = tonumber(tg), client = cl}
end
local function drop(m, w)
  if promoted == m then
    redis.call('DEL', KEYS[7])
    promoted = false
  else
    redis.call('ZREM', lines[w.class], m)
  end
  redis.call('HDEL', KEYS[8], m)
end
local function head()
  if promoted then return promoted end
  if empty then return nil end
  for c = 1, 3 do
    local m = redis.call('ZRANGE', lines[c], 0, 0)[1]
    if m then return m end
  end
  empty = true
  return nil
end
local function waits_in(c)
  return redis.call('ZCARD', lines[c]) > 0
end

-- Decisions: this instance's in the answer, the others' in their lists, announced.
local mine, others = {}, {}
local function tell(w, text)
  if w.inst == inst then
    mine[#mine + 1] = text
  else
    local list = ARGV[11] .. w.inst
    redis.call('RPUSH', list, text)
    redis.call('PEXPIRE', list, s(math.ceil(lease / 1000) * 2))
    others[w.inst] = true
  end
end

-- The starvation floor (fair.rs): a class passed over FLOOR - 1 slots in a row while it
-- waited has its first waiter promoted ahead of every class.
local floor = tonumber(ARGV[12]) - 1
local function served(c)
  local pc = promoted and info(promoted)
  pc = pc and pc.class
  for k = 1, 3 do
    local f = 'p' .. k
    if k ~= c and (pc == k or waits_in(k)) then
      redis.call('HINCRBY', KEYS[9], f, 1)
    else
      redis.call('HDEL', KEYS[9], f)
    end
  end
  if promoted then return end
  for k = 1, 3 do
    if tonumber(redis.call('HGET', KEYS[9], 'p' .. k) or '0') >= floor then
      local m = redis.call('ZRANGE', lines[k], 0, 0)[1]
      if m then
        redis.call('ZREM', lines[k], m)
        redis.call('SET', KEYS[7], m)
        promoted = m
      end
      return
    end
  end
end

-- Newcomers.
local at = 15 + 2 * #ws
local joins = tonumber(ARGV[at])
local outcome = {}
for j = 1, joins do
  local m, about = ARGV[at + 2 * j - 1], ARGV[at + 2 * j]
  if about:byte(1) == 49 then
    local old = info(m)
    if old then drop(m, old) end
  end
  if not held and not head() and next_slot() <= now then
    start(m)
    outcome[j] = 'g'
  else
    outcome[j] = 'w'
    local c, step, max_wait, client = string.match(about, '^%d(%d) (%d+) (%d+) (.*)$')
    c, step, max_wait = tonumber(c), tonumber(step), tonumber(max_wait)
    local vt = tonumber(redis.call('HGET', KEYS[9], 'vt' .. c) or '0')
    local lk = 'c' .. c .. ':' .. client
    local last = tonumber(redis.call('HGET', KEYS[9], lk) or '0')
    local tag = math.max(vt, last) + step
    redis.call('HSET', KEYS[9], lk, s(tag))
    redis.call('ZADD', lines[c], s(tag), m)
    redis.call('HSET', KEYS[8], m, inst .. ' ' .. s(now + max_wait) .. ' ' .. c .. ' ' ..
      s(step) .. ' ' .. s(tag) .. ' ' .. client)
    if not busy then redis.call('SET', KEYS[14], '1') end
    empty, busy, registered = false, true, true
  end
end
-- The lease on the line, renewed while this instance has anyone in it.
if registered then
  redis.call('ZADD', KEYS[10], s(now), inst)
  redis.call('PEXPIRE', KEYS[10], s(math.ceil(lease / 1000) * 4))
end

-- Every slot that is due goes to the head of fair order.
local share = ARGV[13] .. s(math.floor(now / 10000000))
while not held do
  local m = head()
  if not m or next_slot() > now then break end
  local w = info(m)
  if not w then
    if promoted == m then
      redis.call('DEL', KEYS[7])
      promoted = false
    end
    for c = 1, 3 do redis.call('ZREM', lines[c], m) end
  else
    drop(m, w)
    if not is_alive(w.inst) then
      -- Its instance is gone: so is its place.
    elseif w.deadline < now then
      tell(w, 'r ' .. m .. ' 0 0')
    else
      start(m)
      tell(w, 'g ' .. m .. ' ' .. at_now)
      local vt = tonumber(redis.call('HGET', KEYS[9], 'vt' .. w.class) or '0')
      if w.tag > vt then redis.call('HSET', KEYS[9], 'vt' .. w.class, s(w.tag)) end
      redis.call('HINCRBY', share, w.client, w.step)
      redis.call('PEXPIRE', share, 70000)
      served(w.class)
    end
  end
end

if #zadd > 0 then
  redis.call('ZADD', KEYS[1], unpack(zadd))
  redis.call('PEXPIRE', KEYS[1], s(math.ceil(longest / 1000) + 1000))
end

local due = -1
if head() then
  if held then
    due = redis.call('PTTL', KEYS[12]) * 1000
  else
    due = math.max(next_slot() - now, 0)
  end
elseif busy then
  -- Nobody waits any more: nobody to be fair to.
  redis.call('DEL', KEYS[9], KEYS[14])
end

-- Where each waiter's turn comes, if each takes the next free slot in fair order: the
-- ones that can no longer start by their deadline are refused now.
if not held and (walk or joins > 0) and due >= 0 then
  local most = tonumber(ARGV[8])
  local order = {}
  if promoted then order[1] = promoted end
  for c = 1, 3 do
    if #order >= most then break end
    for _, m in ipairs(redis.call('ZRANGE', lines[c], 0, most - #order - 1)) do
      order[#order + 1] = m
    end
  end
  for _, m in ipairs(order) do
    local w = info(m)
    if w and not is_alive(w.inst) then
      drop(m, w)
    elseif w then
      local slot, binding = next_slot()
      if slot > w.deadline then
        drop(m, w)
        local kind = 'r'
        if paused > now then kind = 'p' end
        tell(w, kind .. ' ' .. m .. ' ' .. s(slot - now) .. ' ' .. binding)
      else
        added[#added + 1] = slot
      end
    end
  end
end

for i, _ in pairs(others) do redis.call('PUBLISH', ARGV[10], 'g:' .. i) end
if registered then
  local list = ARGV[11] .. inst
  local queued = redis.call('LRANGE', list, 0, -1)
  if #queued > 0 then
    redis.call('DEL', list)
    for _, t in ipairs(queued) do mine[#mine + 1] = t end
  end
end

local out = {'0', epoch, lapsed, at_now, s(due), table.concat(outcome), tostring(#mine)}
for _, t in ipairs(mine) do out[#out + 1] = t end
for k = 1, #ws do
  -- The log holds the longest window's starts (and those just made) already.
  if ws[k][2] == longest then
    out[#out + 1] = tostring(logged + #zadd / 2)
  else
    out[#out + 1] = tostring(redis.call('ZCOUNT', KEYS[1], '(' .. s(now - ws[k][2]), '+inf'))
  end
end
return out
