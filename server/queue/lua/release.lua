-- KEYS: job, stream, events   ARGV: group, stream id, job id
-- The first write (XACK) needs no memory, so a full Redis still takes a hand-back.
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
local sid = redis.call('XADD', KEYS[2], '*', 'id', ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'queued', 'stream_id', sid, 'step', '0', 'worker', '', 'started', '')
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
