-- Takes one of a key's concurrency slots as a lease that expires unless renewed, on Redis's
-- clock: leases of replicas that died are purged first.
--
-- KEYS[1]: the key's leases (a sorted set of lease ids scored by expiry, ms).
-- ARGV[1]: max_concurrent, ARGV[2]: lease time (ms), ARGV[3]: the new lease's id.
-- Returns {1 if taken else 0, leases held}.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, held + 1}
