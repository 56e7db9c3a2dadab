-- Extends the leases a live replica holds, on Redis's clock. A lease that expired while
-- Redis could not be reached is added back: its request is still in flight.
--
-- KEYS[i]: the sorted set of the i-th lease; ARGV[1]: lease time (ms); ARGV[i + 1]: its id.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
