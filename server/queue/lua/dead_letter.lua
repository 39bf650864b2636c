-- KEYS: job, stream, dead, events, done, done bytes, evicted
-- ARGV: group, stream id, job id, deliveries, now, error json, prefix, ttl, max jobs, max bytes
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '10000', '*', 'id', ARGV[3], 'stream_id', ARGV[2],
           'deliveries', ARGV[4], 'time', ARGV[5])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' or st == 'running' then
  local r = retention(5, 7)
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[6], 'finished', ARGV[5])
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('EXPIRE', KEYS[1], r.ttl)
  retain(r, KEYS[1], ARGV[3], ARGV[5], 0, 0)
  redis.call('PUBLISH', KEYS[4], ARGV[3])
end
return 1
