-- One key's request bucket and token budget, checked and changed in one step on Redis's
-- clock. The same operations in the same order as bucket.rs, so that both backends give
-- the same answers; levels are stored with 17 significant digits, which round-trips a double.
--
-- KEYS[1]: the request bucket, KEYS[2]: the token budget (hashes: l = level, s = stamp, us).
-- ARGV[1]: "admit" or "debit"; ARGV[2]: requests per minute, ARGV[3]: tokens per minute
-- (0: not limited); ARGV[4]: tokens to debit.
-- admit returns {allowed, retry, requests remaining, requests reset, tokens remaining,
-- tokens reset}, times in microseconds; debit returns the tokens remaining.

local MINUTE = 60000000
local MAX_DEBT_MINUTES = 1440

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function level(key, cap)
  local state = redis.call('HMGET', key, 'l', 's')
  local l, s = tonumber(state[1]), tonumber(state[2])
  if l == nil or s == nil then
    return cap
  end
  return math.min(l + math.max(now - s, 0) * cap / MINUTE, cap)
end

local function whole(x)
  if x > 0 then
    return x
  end
  return 0
end

local function reset(l, cap)
  return whole(math.ceil((cap - l) * MINUTE / cap))
end

local function wait(l, cap)
  return whole(math.ceil((1 - l) * MINUTE / cap))
end

local function store(key, l, cap)
  l = math.max(l, -cap * MAX_DEBT_MINUTES)
  local full = reset(l, cap)
  if full > 0 then
    redis.call('HSET', key, 'l', string.format('%.17g', l), 's', string.format('%.17g', now))
    redis.call('PEXPIRE', key, math.ceil(full / 1000))
  else
    redis.call('DEL', key)
  end
  return l
end

local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])

if ARGV[1] == 'debit' then
  local t = store(KEYS[2], level(KEYS[2], tpm) - tonumber(ARGV[4]), tpm)
  return whole(math.floor(t))
end

local r, t = 0, 0
if rpm > 0 then
  r = level(KEYS[1], rpm)
end
if tpm > 0 then
  t = level(KEYS[2], tpm)
end
local requests_ok = rpm == 0 or r >= 1
local tokens_ok = tpm == 0 or t >= 1
local allowed = requests_ok and tokens_ok
local retry = 0
if allowed then
  if rpm > 0 then
    r = r - 1
    store(KEYS[1], r, rpm)
  end
else
  if not requests_ok then
    retry = wait(r, rpm)
  end
  if not tokens_ok then
    retry = math.max(retry, wait(t, tpm))
  end
end
local requests_reset, tokens_reset = 0, 0
if rpm > 0 then
  requests_reset = reset(r, rpm)
end
if tpm > 0 then
  tokens_reset = reset(t, tpm)
end
return {allowed and 1 or 0, retry, whole(math.floor(r)), requests_reset,
  whole(math.floor(t)), tokens_reset}
