-- Orthanc auto-routing to dicomnode: every CT series, once stable (StableAge), is sent
-- to the modality "node" of DicomModalities. Loaded by "LuaScripts" (docs/deploy.md).
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    RestApiPost('/modalities/node/store', '{"Resources":["' .. seriesId .. '"],"Synchronous":false}')
  end
end
