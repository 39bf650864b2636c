-- KEYS: events, job...   ARGV: step, steps, job id...   -> ids whose cancellation was requested
local canceled = {}
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'status') == 'running' then
    redis.call('HSET', KEYS[i], 'step', ARGV[1], 'steps', ARGV[2])
    redis.call('HINCRBY', KEYS[i], 'version', 1)
    redis.call('PUBLISH', KEYS[1], ARGV[i + 1] .. ' p')
    if redis.call('HGET', KEYS[i], 'cancel') == '1' then table.insert(canceled, ARGV[i + 1]) end
  end
end
return canceled
