-- KEYS: stream, job, idempotency ('' = none), input image ('' = none)
-- ARGV: group, max_depth, ttl, job id, fingerprint, input image bytes, field, value, field, value, ...
if KEYS[3] ~= '' then
  local known = redis.call('GET', KEYS[3])
  if known then
    local id = string.match(known, '^(%S+)')
    local known_key = string.gsub(KEYS[2], '[^:]+$', id)
    if redis.call('EXISTS', known_key) == 1 then return {'dup', known} end
  end
end
local pending = 0
local summary = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(summary) == 'table' and summary['err'] then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
else
  pending = tonumber(summary[1])
end
local queued = redis.call('XLEN', KEYS[1]) - pending
if queued >= tonumber(ARGV[2]) then return {'full', tostring(queued)} end
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[3]) end
local sid = redis.call('XADD', KEYS[1], '*', 'id', ARGV[4])
redis.call('HSET', KEYS[2], 'stream_id', sid)
redis.call('EXPIRE', KEYS[2], ARGV[3])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[4] .. ' ' .. ARGV[5], 'EX', ARGV[3]) end
return {'ok', sid}
