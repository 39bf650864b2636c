-- KEYS: job, events, done, done bytes, evicted   ARGV: consumer, now, job id, prefix, ttl, max jobs, max bytes
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 'skip' end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  retain(retention(3, 4), KEYS[1], ARGV[3], ARGV[2], 0, 0)
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  return 'canceled'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started', ARGV[2], 'step', '0')
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HINCRBY', KEYS[1], 'version', 1)
if attempts == 1 then webhook_event(ARGV[4], KEYS[1], 'start', ARGV[2]) end  -- a job run again started before
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 'run'
