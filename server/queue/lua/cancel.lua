-- KEYS: job, stream, events, done, done bytes, evicted   ARGV: now, job id, prefix, ttl, max jobs, max bytes
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return false end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished', ARGV[1], 'cancel', '1')
  local sid = redis.call('HGET', KEYS[1], 'stream_id')
  if sid and sid ~= '' then redis.call('XDEL', KEYS[2], sid) end
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
else
  return st
end
redis.call('HINCRBY', KEYS[1], 'version', 1)
if st == 'queued' then retain(retention(4, 3), KEYS[1], ARGV[2], ARGV[1], 0, 0) end
redis.call('PUBLISH', KEYS[3], ARGV[2])
return st
