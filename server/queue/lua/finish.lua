-- KEYS: job, events, done, done bytes, evicted, image...
-- ARGV: job id, now, status, payload field ('' = none), payload, prefix, ttl, max jobs, max bytes, image...
-- Compare-and-set: only a job without a final state gets one. Returns 1 stored, 2 canceled instead, 0 nothing.
-- The first write needs memory (SET or HSET): a full Redis refuses the whole script, never half of it.
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
local r = retention(3, 6)
local status = ARGV[3]
if status == 'succeeded' and redis.call('HGET', KEYS[1], 'cancel') == '1' then status = 'canceled' end
local images, image_bytes = 0, 0
if status == 'succeeded' then
  for i = 6, #KEYS do
    redis.call('SET', KEYS[i], ARGV[i + 4], 'EX', r.ttl)
    images, image_bytes = images + 1, image_bytes + #ARGV[i + 4]
  end
  redis.call('HSET', KEYS[1], 'step', redis.call('HGET', KEYS[1], 'steps'))
end
if status == ARGV[3] and ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[4], ARGV[5]) end
redis.call('HSET', KEYS[1], 'status', status, 'finished', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], r.ttl)
retain(r, KEYS[1], ARGV[1], ARGV[2], images, image_bytes)
redis.call('PUBLISH', KEYS[2], ARGV[1])
if status == ARGV[3] then return 1 end
return 2
